"""Training labels for the branches.

- ``tristate``: stage-1 tri-state pseudo labels from an attention map, and the sink filters (pure);
- ``attention``: response-to-image attention of the base model while it generates its answer;
- ``jobs``: what the resumable jobs share (record ids and checks, sharded output, the run loop);
- ``pseudo``: the resumable ``qzoom pseudo-labels`` job (ms-swift jsonl in, labelled shards out);
- ``visualize``: the ``qzoom visualize`` PNG (image, pseudo label, predicted heatmap, box).
"""
