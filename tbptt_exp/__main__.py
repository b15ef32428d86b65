"""``python -m tbptt_exp``: see ``tbptt_exp.app.cli``."""

from tbptt_exp.app.cli import main

if __name__ == "__main__":
    main()
