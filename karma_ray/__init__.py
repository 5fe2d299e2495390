"""karma-ray: KARMA personalised search on Ray."""

__version__ = "0.1.0"
