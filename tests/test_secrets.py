"""Passwords leave the URLs: masked wherever a URL is shown, moved to the variables their
clients read, and refused (masked) where they cannot be read back."""


import pytest

from tbptt_exp.app.tracking.stores import mask_credentials, take_secrets
from tbptt_exp.core.config import ConfigError


@pytest.mark.parametrize("text, masked", [
    ("http://alice:pw@host:5000/x", "http://alice:***@host:5000/x"),
    ("tracking.uri=http\\://alice\\:pw@host\\:5000", "tracking.uri=http\\://alice:***@host\\:5000"),
    ("postgresql+psycopg://root:s3cret@db/optuna", "postgresql+psycopg://root:***@db/optuna"),
    ("http://host:5000 and sqlite:////a/b.db", "http://host:5000 and sqlite:////a/b.db"),
    # A raw @, : or / in a password: no part of it shows (the password runs to the URL's last @).
    ("postgresql+psycopg://root:Pg@Raw:pw/77zz@127.0.0.1/db", "postgresql+psycopg://root:***@127.0.0.1/db"),
    ("uri='http://a:x/y@h:1' done", "uri='http://a:***@h:1' done"),
])
def test_credentials_are_masked_in_plain_and_hydra_escaped_form(text, masked):
    assert mask_credentials(text) == masked


def test_passwords_move_from_urls_to_the_variables_their_clients_read():
    environ = {}
    cleaned = take_secrets({
        "tracking.uri": "http://alice:p%40ss@mlflow.example:5000",
        "hydra.sweeper.storage": "postgresql+psycopg://root:pg-pw@db:5432/optuna",
        "other": "sqlite:////tmp/x.db",
    }, environ)
    assert cleaned == {"tracking.uri": "http://mlflow.example:5000",
                       "hydra.sweeper.storage": "postgresql+psycopg://root@db:5432/optuna"}
    assert environ == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss",
                       "PGPASSWORD": "pg-pw"}
    with pytest.raises(ConfigError, match="second, different password for PGPASSWORD"):
        take_secrets({"tracking.uri": "postgresql://a:one@db/m", "hydra.sweeper.storage": "postgresql://a:two@db/o"}, {})


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://root:Pg@Raw:pw/77zz@127.0.0.1/db", "postgresql+psycopg://root:***@127.0.0.1/db"),
    ("http://alice:a/b@host:5000", "http://alice:***@host:5000"),
    ("http://alice:a#b@host:5000", "http://alice:***@host:5000"),
    ("postgresql://root:a:b@db/x", "postgresql://root:***@db/x"),
])
def test_a_password_with_raw_special_characters_is_refused_masked_with_how_to_encode_it(url, shown):
    with pytest.raises(ConfigError) as refused:
        take_secrets({"tracking.uri": url}, {})
    assert str(refused.value).startswith(f"tracking.uri='{shown}' is not allowed: percent-encode special characters")
    assert "%40" in str(refused.value)


def test_a_password_in_the_environments_tracking_uri_moves_to_mlflows_password_variable():
    from tbptt_exp.app.preflight.passwords import take_environment_secrets

    environ = {"MLFLOW_TRACKING_URI": "http://alice:S3cret@mlflow.example:5000"}
    take_environment_secrets(environ)
    assert environ == {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000", "MLFLOW_TRACKING_USERNAME": "alice",
                       "MLFLOW_TRACKING_PASSWORD": "S3cret"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("postgresql://user:s3cret@db:5432/optuna", "postgresql://user:***@db:5432/optuna"),
        ("http://alice:pw@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_credentials_are_masked_in_store_urls_of_every_kind(text, expected):
    assert mask_credentials(text) == expected
