import pytest

from jobs.settings import RescoreSettings
from reranker.errors import ConfigError
from reranker.settings import DEFAULT_MODEL, ModelSettings, parse_flags
from serve.settings import ServeSettings

pytestmark = pytest.mark.unit


def parse(*argv: str) -> dict:
    return parse_flags(RescoreSettings, list(argv), prog="test", description="test")


def test_defaults():
    """Defaults: the TinyBERT hub id, fp32, 512 tokens, raw logits."""
    model = RescoreSettings.load().model
    assert model.model == DEFAULT_MODEL
    assert (model.precision, model.max_length, model.activation) == ("fp32", 512, "none")


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path, monkeypatch):
    """CLI flags beat env vars, which beat the config file, which beats defaults."""
    config = tmp_path / "rescore.yaml"
    config.write_text(
        "model: from-file\nmax_length: 128\nquery_column: q_file\ntop_k: 3\ngroup_column: qid\n"
    )
    monkeypatch.setenv("RERANK_CONFIG", str(config))
    monkeypatch.setenv("RERANK_MAX_LENGTH", "256")
    monkeypatch.setenv("RERANK_QUERY_COLUMN", "q_env")
    settings = RescoreSettings.load(**parse("--query-column", "q_flag"))
    assert settings.job.query_column == "q_flag"  # flag > env
    assert settings.model.max_length == 256  # env > file
    assert settings.model.model == "from-file"  # file > default
    assert settings.job.passage_column == "passage"  # default
    assert (settings.job.top_k, settings.job.group_column) == (3, "qid")  # a validator sees every layer


def test_config_flag_names_the_file(tmp_path):
    """--config loads the YAML file given on the command line."""
    config = tmp_path / "c.yaml"
    config.write_text("rows_per_unit: 77\n")
    assert RescoreSettings.load(**parse("--config", str(config))).job.rows_per_unit == 77


def test_settings_are_frozen():
    """One immutable settings object per process."""
    settings = RescoreSettings.load()
    with pytest.raises(Exception, match="frozen"):
        settings.model.model = "other"  # type: ignore[misc]
    with pytest.raises(Exception, match="frozen"):
        settings.job = settings.job  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"max_length": 0}, "max_length"), ({"precision": "fp64"}, "precision"), ({"top_k": 0}, "top_k")],
)
def test_invalid_values_name_the_setting(overrides, field):
    """A bad value raises ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=field):
        RescoreSettings.load(**overrides)


def test_unknown_key_in_config_file_is_rejected(tmp_path):
    """A typo in the config file is an error, not silently ignored."""
    config = tmp_path / "c.yaml"
    config.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="modle"):
        RescoreSettings.load(config_file=str(config))


def test_missing_config_file_is_a_config_error(tmp_path):
    """A config path that does not exist fails naming it."""
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        RescoreSettings.load(config_file=str(tmp_path / "nope.yaml"))


def test_rank_needs_group_column():
    """--rank / --top-k without a query-id column is a settings error."""
    with pytest.raises(ConfigError, match="group-column"):
        RescoreSettings.load(top_k=5)


def test_boolean_and_json_flags():
    """Booleans take --x/--no-x; dict settings take JSON."""
    values = parse("--rank", "--no-overwrite", "--storage-options", '{"anon": true}')
    assert values == {"rank": True, "overwrite": False, "storage_options": {"anon": True}}


def test_unset_flags_do_not_override():
    """Flags the user did not give leave lower sources in charge."""
    assert parse() == {}


def test_sections_give_each_name_one_meaning():
    """No setting name appears in two sections, so one env var or key means one thing."""
    for composed in (RescoreSettings, ServeSettings):
        names = [name for section in composed.sections().values() for name in section.model_fields]
        assert len(names) == len(set(names))


def test_serve_args_sit_below_env_and_config_file(tmp_path, monkeypatch):
    """A Serve config's args are file-level values: env vars and RERANK_CONFIG beat them."""
    config = tmp_path / "c.yaml"
    config.write_text("max_documents: 7\n")
    monkeypatch.setenv("RERANK_CONFIG", str(config))
    monkeypatch.setenv("RERANK_MODEL", "from-env")
    args = {"model": "from-args", "max_documents": 3, "max_batch_pairs": 64}
    settings = ServeSettings.load(file_values=args)
    assert settings.model.model == "from-env" and settings.serving.max_documents == 7
    assert settings.model.max_batch_pairs == 64 and settings.served_model_name == "from-env"


def test_unknown_serve_arg_is_rejected():
    """A misspelt Serve arg fails naming it."""
    with pytest.raises(ConfigError, match="max_docs"):
        ServeSettings.load(file_values={"max_docs": 3})


def test_model_settings_alone_read_env(monkeypatch):
    """A section loads on its own from env vars (the model class needs only ModelSettings)."""
    monkeypatch.setenv("RERANK_MAX_LENGTH", "128")
    assert ModelSettings.load().max_length == 128


def test_a_flag_that_cannot_be_parsed_is_a_config_error():
    """Bad JSON for a mapping flag is one ConfigError naming the setting, not a traceback."""
    with pytest.raises(ConfigError, match="storage_options"):
        parse("--storage-options", "{bad")


def test_help_lists_every_setting_with_its_env_variable(capsys):
    """--help names each setting's flag and RERANK_ variable, and --config."""
    with pytest.raises(SystemExit):
        parse("--help")
    shown = " ".join(capsys.readouterr().out.split())
    for section in RescoreSettings.sections().values():
        for name in section.model_fields:
            assert f"--{name.replace('_', '-')}" in shown and f"RERANK_{name.upper()}" in shown
    assert "--config FILE" in shown


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_a_start_up_error(monkeypatch, key):
    """A secret that resolved empty fails closed: the service does not start without auth by surprise."""
    monkeypatch.setenv("RERANK_API_KEY", key)
    with pytest.raises(ConfigError, match=r"api_key: .*is empty"):
        ServeSettings.load()


def test_an_unknown_rerank_variable_is_warned_about_once(monkeypatch, caplog):
    """A typo such as RERANK_APIKEY is named, with the setting it resembles, once per process."""
    from reranker import settings as core

    monkeypatch.setattr(core, "_warned_env", set())
    monkeypatch.setenv("RERANK_APIKEY", "sekret")
    monkeypatch.setenv("RERANK_PROXY_APPS", "rerank")  # the proxy's own: known to the service
    monkeypatch.setenv("RERANK_EVAL_QRELS", "q.txt")  # the evaluation job's prefix
    with caplog.at_level("WARNING", logger="reranker.settings"):
        ServeSettings.load()
        ServeSettings.load()
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "RERANK_APIKEY is not a setting of ServeSettings and is ignored; did you mean RERANK_API_KEY?"
    ]
