"""What runs stages: the stage runner (:mod:`.stages`), ``make demo`` (:mod:`.class_demo`), ``make demo-text``
(:mod:`.text_demo`), the next-scale vs next-token ablation (:mod:`.ablation`), the scaling fits
(:mod:`.scaling_sweep`) and the notebooks' small models (:mod:`.notebook_models`)."""
