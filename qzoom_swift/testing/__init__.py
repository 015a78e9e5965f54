"""Test-only fixtures (library code never imports this package): tiny local copies of the evaluation benchmarks.

Locally built models, tokenizers and images live in ``qzoom_swift.synthetic``; the demo, the benchmarks and
``qzoom build-tiny`` use them too.
"""
