"""MkDocs hook: the settings reference is generated from the config dataclasses as the
site builds (``tbptt_exp.app.settings_reference``), so it cannot go stale."""

MARKER = "<!-- settings reference -->"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    from tbptt_exp.app.settings_reference import reference_markdown

    return markdown.replace(MARKER, reference_markdown())
