from frankenmoe.cli import app

app(prog_name="frankenmoe")
