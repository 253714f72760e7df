from quantum_trader.cli.main import run

run()
