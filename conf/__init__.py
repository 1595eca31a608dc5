"""varlib's Hydra configs (``pkg://varlib.conf``): the repository's ``conf/`` folder, shipped inside the package."""
