from mlxtune.cli import run

run()
