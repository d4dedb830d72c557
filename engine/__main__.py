from engine.cli.app import run

run()
