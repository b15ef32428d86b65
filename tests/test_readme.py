"""The README's quick-start commands are what CI runs, verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    return [line for line in blocks[0].splitlines() if line.strip()] if blocks else []


def test_ci_runs_the_readme_test_command_verbatim():
    commands = readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_is_a_front_page_whose_links_open_and_every_page_is_on_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and all((ROOT / link).is_file() for link in links), links
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == set(re.findall(r":\s*([\w-]+\.md)\s*$", nav, re.MULTILINE)), "a page missing from the nav"
    assert {Path(link).name for link in links} == pages  # the README links every page


def test_the_settings_reference_lists_every_setting_with_its_rule_and_comment():
    import dataclasses

    from tbptt_exp.app.settings import RunConfig
    from tbptt_exp.app.settings_reference import reference_markdown
    from tbptt_exp.core.config import DATA_KINDS

    reference = reference_markdown()

    def settings(cls, prefix):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            if dataclasses.is_dataclass(value):
                if f.name != "data":
                    yield from settings(type(value), f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    names = list(settings(RunConfig, "")) + [f"data.{f.name}" for c in DATA_KINDS.values()
                                                     for f in dataclasses.fields(c)]
    assert len(names) > 80
    missing = [n for n in names if f"| `{n}` |" not in reference]
    assert not missing, missing
    rows = {line.split(" | ")[0][3:-1]: line for line in reference.splitlines() if line.startswith("| `")}
    assert "chunk length: timesteps per TBPTT chunk" in rows["k"]  # the comment beside the field
    assert "use a positive whole number" in rows["k"]  # its rule's words
    assert "`pack`" in rows["padding"] and "`dummy`" in rows["padding"]  # an enum's values
    # a comment written above a field, over two lines
    assert "the gradient noise scale" in rows["trainer.noise_scale_every"]
