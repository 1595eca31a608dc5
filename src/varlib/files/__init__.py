"""varlib's model files: the format, ``save_pretrained`` / ``from_pretrained``, model cards and the Hub
(:mod:`.format`, with the registry of model classes), :func:`varlib.load` and the training checkpoints' conventions
(:mod:`.loading`), and the official FoundationVision checkpoints (:mod:`.official`)."""
