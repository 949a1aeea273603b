"""Names the dead-code check in `make test` (vulture, run on frankenmoe/) cannot see being used, each with its user.

Not executed: vulture only reads the names.
"""

__getattr__  # frankenmoe/__init__.py's module __getattr__: Python calls it for the lazy exports
SCHEMA_FILE  # tests/test_config_schema.py compares the shipped schema with the generated one
score_folder  # benchmarks/quality scores with it
router_inputs_by_layer  # benchmarks/routing
write_toy_model  # tests, the toy demo and the benchmarks
inspect_command  # registered with typer by its decorator
eval_command  # registered with typer by its decorator
_.maxother, _.maxstring, _.maxlevel, _.maxdict, _.maxlist, _.maxset, _.maxtuple  # reprlib.Repr limits
_.fout  # gguf.GGUFWriter's output list, which the writer writes to
_.n  # tqdm's position, which the bar shows
