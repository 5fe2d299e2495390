"""The frozen trunk's output for fixed text, computed once and shared by every arm and seed.

With `model.trainable_layers = k`, nothing below layer L−k ever changes, so the states entering that
layer are a pure function of (backbone, k, prompt settings, data). `build.ensure_cache` computes them
with Ray Data (an actor pool running the trunk) for

  items     item text + [ITEM]            (the item tower)
  targets   [BOS] "Next: " + item text    (L_recon's text, decoded from P(h))
  train     query + history + [INT] + "Next: " + target text   (L_act's interest and L_gen's text)
  eval      query + history + [INT] for every evaluation event of the protocol

and stores them as bf16 (or fp32) bytes in Parquet shards under a directory named by a hash of that
key, never pickled. `store.TrunkCache` reads them back: Ray Data streams `train` into Ray Train
workers, which look item and target states up in memory.
"""
