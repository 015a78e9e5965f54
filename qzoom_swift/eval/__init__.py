"""Evaluation through evalscope: the ``qzoom`` ModelAPI, plugin benchmarks, ``qzoom eval`` and its report.

- ``suite``: the benchmark table (names, local folder layouts, presets) and run specs (baseline/zoom at budgets);
- ``command``: ``qzoom eval``: one worker process per run, resumable per-benchmark results;
- ``devices``: ``qzoom eval --devices``: (run x benchmark) workers in parallel, one per device;
- ``model_api``: the evalscope ModelAPI ``qzoom`` (a base VLM plus an optional branch checkpoint);
- ``batcher``: groups evalscope's concurrent calls into one batched ``generate`` (``--eval-batch-size``);
- ``benchmarks``: benchmarks that evalscope 1.14 lacks, registered as evalscope plugins;
- ``report``: the summary table, CSV and Pareto plot.

Nothing is imported here, so ``qzoom --help`` stays fast; ``import qzoom_swift.eval.model_api`` registers
the ModelAPI and the plugin benchmarks with evalscope.
"""
