"""The pipeline's steps, one module each, in the order optimizer/pipeline.py runs them: load,
inputs, data, export, variants, evaluate, fallback, benchmark, select, analyze, report."""
