"""Settings: every one is documented, and the allow-list and overrides parse as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.support.harness import TENANT_A, TENANT_B, isolated_settings
from worker.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize(
    "variable", sorted(str(f.validation_alias) for f in Settings.model_fields.values())
)
def test_every_setting_has_a_row_in_the_readme_settings_table(variable: str) -> None:
    assert re.search(rf"^\| `{variable}`", README, re.MULTILINE) or re.search(
        rf"^\| `[A-Z_]+` / `{variable}`|^\| `{variable}` / `", README, re.MULTILINE
    ), f"{variable} is not in the README's settings table"


def test_the_allow_list_defaults_to_the_default_tenant_and_splits_on_commas() -> None:
    assert isolated_settings({"AZURE_TENANT_ID": TENANT_A}).served_tenants == {TENANT_A}
    both = isolated_settings({"ALLOWED_TENANT_IDS": f" {TENANT_A.upper()} , {TENANT_B}"})
    assert both.served_tenants == {TENANT_A, TENANT_B}


def test_tenant_ids_in_the_allow_list_and_overrides_must_be_uuids() -> None:
    with pytest.raises(ValidationError, match="ALLOWED_TENANT_IDS"):
        isolated_settings({"ALLOWED_TENANT_IDS": "contoso.onmicrosoft.com"})
    with pytest.raises(ValidationError, match="TENANT_RATE_LIMITS"):
        isolated_settings({"TENANT_RATE_LIMITS": {"contoso": 5}})


def test_a_secret_and_a_certificate_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        isolated_settings(
            {"AZURE_CLIENT_SECRET": "s", "AZURE_CLIENT_CERTIFICATE_PATH": "/tmp/cert.pem"}  # noqa: S108
        )


def test_the_amqp_password_is_masked_for_log_lines() -> None:
    settings = isolated_settings({"AMQP_URL": "amqp://worker:hunter2@broker:5672/vhost"})
    assert settings.redacted_amqp_url() == "amqp://worker:***@broker:5672/vhost"
