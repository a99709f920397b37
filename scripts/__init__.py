"""Command-line tools around the server: `train-adapter` (train_adapter.py) and `eval-adapter` (eval_adapter.py)."""
