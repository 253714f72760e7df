"""Read models: what `qt status`, `qt audit`, `qt report` and the dashboard show, read from the store.

Nothing here writes or renders: the CLI prints these (cli/), the dashboard serves them (web/). Operator
actions, the write side, are ``quantum_trader.ops``.
"""
