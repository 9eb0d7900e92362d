"""``python -m grpodx.bench [options]`` is ``grpodx bench [options]``."""

import sys

from typer.main import get_command

from grpodx.cli import app

if __name__ == "__main__":
    get_command(app).commands["bench"].main(args=sys.argv[1:], prog_name="python -m grpodx.bench")
