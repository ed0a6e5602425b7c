"""Development and operations tools (not the product: ``backend`` and ``ssp_sam`` never import them). A package so
that the tests and ``python -m scripts.demo`` can import the shared ``scripts.labelstudio_headless``."""
