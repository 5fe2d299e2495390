"""The artifact package: layout and safe writes (torch-free), FAISS building, and loading back.

`karma_ray.artifact.layout` never imports torch, so light Serve stages can resolve and read manifests
without loading the model; `reader` and `writer` do.
"""
