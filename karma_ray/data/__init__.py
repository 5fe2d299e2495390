"""Data layer: Arrow schemas and validation, dataset sources (MovieLens, synthetic), splits, preparation."""
