"""Write docs/settings.md from the settings models, so the tables can never disagree with the code.

python -m tools.settings_doc          # rewrite docs/settings.md
python -m tools.settings_doc --check  # exit 1 if it is out of date (the tests do this too)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from jobs.settings import EvaluateSettings, JobSettings
from reranker.cascade import CascadeSettings, CascadeStage
from reranker.settings import ModelSettings, SettingsSection
from serve.settings import ServingSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
HEADER = """# Settings

Generated from the settings models by `python -m tools.settings_doc` (a test fails when they disagree).

One frozen settings object per program, composed of sections: the model's settings (shared by the job and
the service), then the program's own. Precedence, highest first: **CLI flags > `RERANK_*` env vars > the
config file (`--config` / `RERANK_CONFIG`, YAML with the names below) > a Serve config's `args` >
defaults.** Above them all, the service's batching keys take a deployment's `user_config`, key by key
([serving](serving.md#user_config-batching-without-a-redeploy)). Unknown names are errors; an unknown
`RERANK_*` variable is a warning naming it. Flags come from pydantic-settings' CLI source: booleans as
`--x` / `--no-x`, mappings as JSON, `null` for "not set"; `--help` lists them with their defaults. Where
each program reads them on a cluster: [deployment](deployment.md#where-each-setting-is-read-on-a-cluster).
"""
SECTIONS: list[tuple[str, str, type[SettingsSection], bool]] = [  # title, purpose, settings, are flags
    ("Model", "Shared by the job (as flags) and the service (as `args` keys).", ModelSettings, True),
    ("Rescoring job", "`python -m jobs.rescore`; also `--config FILE`.", JobSettings, True),
    (
        "Cascade",
        "Shared by the job and the service: a list of stages (YAML list, or JSON for the flag and env "
        "var), each with the keys below plus any model key (`model`, `precision`, `max_length`, ...; "
        "unset ones come from the model settings). See [cascades](cascades.md).",
        CascadeSettings,
        True,
    ),
    (
        "Service",
        "`serve/`: keys of the Serve config's `args`, or env vars in the replica; the batching ones "
        "(`max_batch_pairs`, `batch_wait_timeout_s`, `max_pending_pairs`) also change live through "
        "`user_config`.",
        ServingSettings,
        False,
    ),
    ("Evaluation", "`python -m jobs.evaluate`.", EvaluateSettings, True),
]


def render() -> str:
    """The whole of docs/settings.md."""
    parts = [HEADER]
    for title, purpose, section, has_flags in SECTIONS:
        parts.append(f"\n## {title}\n\n{purpose}\n\n{table(section, has_flags)}")
        if section is CascadeSettings:
            parts.append(f"\nKeys of each stage:\n\n{stage_table()}")
    return "".join(parts)


def stage_table() -> str:
    """The keys a cascade stage adds to the model's."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in CascadeStage.model_fields.items():
        if name not in ModelSettings.model_fields:
            rows.append(f"| `{name}` | {default_of(field)} | {field.description or ''} |")
    return "\n".join(rows) + "\n"


def table(section: type[SettingsSection], has_flags: bool) -> str:
    """One Markdown table: flag (or key), env var, default, meaning."""
    prefix = section.model_config.get("env_prefix", "")
    rows = ["| flag | env | default | meaning |" if has_flags else "| key | env | default | meaning |"]
    rows.append("|---|---|---|---|")
    for name, field in section.model_fields.items():
        key = "--" + name.replace("_", "-") if has_flags else name
        rows.append(
            f"| `{key}` | `{prefix}{name.upper()}` | {default_of(field)} | {field.description or ''} |"
        )
    return "\n".join(rows) + "\n"


def default_of(field: FieldInfo) -> str:
    """The field's default as the docs show it."""
    value = field.get_default(call_default_factory=True)
    return (
        "—"
        if value is None or value == {}
        else f"`{str(value).lower() if isinstance(value, bool) else value}`"
    )


def main() -> int:
    """Rewrite the file, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/settings.md is out of date")
    if parser.parse_args().check:
        current = DOC.exists() and DOC.read_text() == render()
        print("docs/settings.md is up to date" if current else "docs/settings.md is out of date")
        return 0 if current else 1
    DOC.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
