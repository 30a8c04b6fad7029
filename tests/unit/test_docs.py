"""The docs: the settings tables are generated from the models, the README is a short front door whose
links resolve."""

import re

import pytest

from tests.helpers import REPO_ROOT
from tools import settings_doc

pytestmark = pytest.mark.unit


def test_the_settings_doc_is_generated_from_the_models():
    """docs/settings.md equals what the settings models generate (run `python -m tools.settings_doc`)."""
    assert settings_doc.DOC.read_text() == settings_doc.render()


def test_every_setting_is_in_the_settings_doc():
    """Each field of each settings section has a row, with its env var and description."""
    text = settings_doc.DOC.read_text()
    for _, _, section, _ in settings_doc.SECTIONS:
        prefix = section.model_config.get("env_prefix", "")
        for name, field in section.model_fields.items():
            assert f"`{prefix}{name.upper()}`" in text and (field.description or "") in text, name


def test_the_readme_is_a_front_door_and_its_links_resolve():
    """Under 250 lines, the two fresh-machine commands first, and every relative link points at a file."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    first_lines = readme.splitlines()[3:5]
    assert first_lines[0].startswith("make demo ") and first_lines[1].startswith("make test ")
    for document in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text()):
            assert (document.parent / target).exists(), f"{document.name} links to missing {target}"
