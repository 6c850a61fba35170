from fedct.cli import app

app(prog_name="fedct")
