"""Settings: defaults, the YAML file, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import load_settings
from dicomnode.errors import ConfigError

EXAMPLE = """
node:
  ae_title: DICOMNODE
  host: 127.0.0.1        # 0.0.0.0 in a hospital deployment
  port: 11112
  allowed_calling_aets: [ORTHANC, CT_SCANNER_1]
storage:
  path: ./var/storage
  min_free_mb: 1024
database:
  url: sqlite:///./var/dicomnode.db
completion:
  series_quiet_seconds: 10
"""


def test_defaults_without_any_file() -> None:
    s = load_settings(environ={})
    assert (s.node.ae_title, s.node.port, s.node.host) == ("DICOMNODE", 11112, "127.0.0.1")
    assert s.storage.path == Path("./var/storage")
    assert s.database.url == "sqlite:///./var/dicomnode.db"
    assert s.node.allowed_calling_aets == () and s.storage.duplicate_policy == "replace"


def test_issue_example_and_env_override(tmp_path: Path) -> None:
    f = tmp_path / "node.yaml"
    f.write_text(EXAMPLE)
    s = load_settings(f, environ={})
    assert s.node.allowed_calling_aets == ("ORTHANC", "CT_SCANNER_1")
    assert s.completion.series_quiet_seconds == 10.0 and s.source == f
    env = {"DICOMNODE_NODE__PORT": "11113",
           "DICOMNODE_NODE__ALLOWED_CALLING_AETS": "[PACS1, PACS2]",
           "DICOMNODE_STORAGE__DUPLICATE_POLICY": "keep",
           "DICOMNODE_CONFIG": str(f)}
    s = load_settings(environ=env)  # file from $DICOMNODE_CONFIG, env wins over it
    assert s.node.port == 11113 and s.node.allowed_calling_aets == ("PACS1", "PACS2")
    assert s.storage.duplicate_policy == "keep" and s.storage.min_free_mb == 1024


@pytest.mark.parametrize(("env", "message"), [
    ({"DICOMNODE_NODE__PORT": "70000"}, "node.port: 70000 is not a TCP port"),
    ({"DICOMNODE_NODE__PORT": "abc"}, "node.port: expected an integer"),
    ({"DICOMNODE_NODE__AE_TITLE": "WAY_TOO_LONG_AE_TITLE"}, "node.ae_title"),
    ({"DICOMNODE_NODE__ALLOWED_CALLING_AETS": "[OK, 'BAD\\\\AE']"},
     "node.allowed_calling_aets[1]"),
    ({"DICOMNODE_STORAGE__DUPLICATE_POLICY": "ignore"}, "storage.duplicate_policy"),
    ({"DICOMNODE_STORAGE__MIN_FREE_MB": "-1"}, "storage.min_free_mb"),
    ({"DICOMNODE_COMPLETION__SERIES_QUIET_SECONDS": "0"}, "completion.series_quiet_seconds"),
    ({"DICOMNODE_NODE__RECEIVERS": "0"}, "node.receivers"),
    ({"DICOMNODE_NODE__COLOUR": "red"}, "node.colour: unknown key"),
    ({"DICOMNODE_DATABASE__URL": "dicomnode.db"}, "database.url"),
])
def test_errors_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(environ=env)
    assert message in str(exc.value)


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml", environ={})
    f = tmp_path / "bad.yaml"
    f.write_text("node: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(f, environ={})
    f.write_text("storage:\n  path: [1]\n")
    with pytest.raises(ConfigError, match="storage.path: expected a path"):
        load_settings(f, environ={})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"notifications": [{"name": "dash", "kind": "webhook", "url": "ftp://x"}]},
     "notifications[0].url: a webhook needs an http:// or https:// URL"),
    ({"notifications": [{"name": "ris", "kind": "hl7", "port": 2575}]},
     "notifications[0].host: an hl7 notification needs the MLLP host"),
    ({"notifications": [{"name": "ris", "kind": "hl7", "host": "h", "port": 0}]},
     "notifications[0].port: 0 is not a TCP port"),
    ({"notifications": [{"name": "d", "kind": "webhook", "url": "http://h/x",
                         "retry_deadline_seconds": 0}]},
     "notifications[0].retry_deadline_seconds: must be > 0"),
    ({"notifications": [{"name": "d", "kind": "fax", "url": "http://h/x"}]},
     "notifications[0].kind"),
    ({"notifications": [{"name": "", "kind": "webhook", "url": "http://h/x"}]},
     "notifications[0].name: must not be empty"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
      "notifications": [{"name": "pacs", "kind": "webhook", "url": "http://h/x"}]},
     "notifications[0].name: 'pacs' is also a destination name"),
])
def test_notification_errors_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, environ={}, overrides=overrides)
    assert message in str(exc.value)
