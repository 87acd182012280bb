"""Field help in the Prefect UI: the deployment form renders every parameter description as markdown (GFM, HTML
allowed and then sanitised), so `<K>` vanishes as an HTML tag, `*x*`, `_x_`, backticks, `~x~` and `[t](url)`
lose their marks, `\\` escapes and `&amp;` entities are folded. Found by loading a deployment whose
descriptions held each candidate character into the real UI in headless Chromium (lone `<`/`>`, `|`, `{}`, `$`,
quotes and underscores inside words come through; `<`/`>` are refused anyway: one more character and they are a
tag).

The static test renders each description with markdown-it (CommonMark plus strikethrough, close to the UI's
renderer) and compares the visible text; the browser test loads the real form page of a real Prefect server and
finds every description in it.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from adapterflow.flows.save_adapter import save_adapter

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def descriptions(schema: dict, path: str = "") -> dict[str, str]:
    """Every `description` in a JSON schema (definitions included), by where it sits."""
    found = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            found[path or "(root)"] = value
        elif isinstance(value, dict):
            found.update(descriptions(value, f"{path}.{key}" if path else key))
    return found


def flow_schema() -> dict:
    return save_adapter.parameters.model_dump(mode="json")


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def visible_text(markdown: str) -> str:
    """What a markdown renderer shows of `markdown`: rendered to HTML, tags dropped, entities decoded."""
    from markdown_it import MarkdownIt  # rich's dependency, so Prefect's

    rendered = MarkdownIt("commonmark").enable("strikethrough").render(markdown)
    return normalized(html.unescape(re.sub(r"<[^>]*>", "", rendered)))


def test_the_schema_has_the_help_texts():
    found = descriptions(flow_schema())
    assert len(found) >= 30
    assert found["definitions.AdapterSettings.properties.init"].startswith("lora | gaussian | random | pissa | pissa_niter_K")


def test_no_description_loses_characters_when_rendered():
    lost = {where: (text, visible_text(text)) for where, text in descriptions(flow_schema()).items()
            if "<" in text or ">" in text or visible_text(text) != normalized(text)}
    assert lost == {}, "descriptions the Prefect UI would show altered (use e.g. {run dir}, pissa_niter_K)"


def test_the_checker_catches_what_the_ui_drops():
    for text in ("pissa_niter_<K>", "a *b* c", "`code`", "[t](http://x)", "a \\_b", "~~x~~", "__init__", "&amp;"):
        assert visible_text(text) != normalized(text), text
    for text in ("pissa_niter_K", "{run dir}/adapter", "MLFLOW_TRACKING_USERNAME", "a | b", "'.' becomes '_'"):
        assert visible_text(text) == normalized(text), text


def _chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _page_text(url: str) -> str:
    """The rendered page's text, from headless Chromium's DOM after the app has rendered."""
    result = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,4000",
                             "--virtual-time-budget=20000", "--dump-dom", url],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", result.stdout, flags=re.S)
    body = re.sub(r"</?(a|span|em|strong|code|del|b|i)\b[^>]*>", "", body)  # inline: e.g. a linkified URL
    return normalized(html.unescape(re.sub(r"<[^>]*>", " ", body)))


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)")
def test_the_deployment_form_shows_every_help_text(prefect_api):
    """The deployment's custom-run form, as a user opens it in the Prefect UI, holds every description whole."""
    from prefect.client.orchestration import get_client

    schema = flow_schema()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(save_adapter)
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=f"form-test-{uuid.uuid4().hex[:8]}", entrypoint=save_adapter.__module__ +
            ".save_adapter", parameter_openapi_schema=schema, enforce_parameter_schema=True)
    ui = prefect_api.removesuffix("/api")
    text = _page_text(f"{ui}/deployments/deployment/{deployment_id}/run")
    assert "lora | gaussian | random | pissa | pissa_niter_K (PiSSA with K fast-SVD iterations" in text
    missing = {where: help_text for where, help_text in descriptions(schema).items()
               if where.startswith("definitions.") and normalized(help_text) not in text}
    assert missing == {}


def test_the_nightly_deployment_runs_behind_the_promotion_gate():
    import yaml

    from adapterflow.flows.parameters import SaveAdapterParameters
    from adapterflow.tasks.parameter_checks import promotion_problems

    declared = yaml.safe_load((Path(__file__).parents[2] / "deployments" / "prefect.yaml").read_text())
    nightly = next(d for d in declared["deployments"] if d["name"] == "nightly")
    config = SaveAdapterParameters.model_validate(nightly["parameters"]["config"])
    assert config.promote.explicitly_enabled() and config.promote.alias == "champion"
    assert not config.hub.push_when_not_promoted and promotion_problems(config) == []
    off = SaveAdapterParameters.model_validate({**nightly["parameters"]["config"], "mlflow": {"enabled": False}})
    assert "promote.enabled=true needs mlflow.enabled=true" in promotion_problems(off)[0]


def test_max_shard_size_takes_a_number_of_bytes_as_transformers_does():
    """`--set export.max_shard_size=1000000` (an int, as save_pretrained takes it) is accepted, here and by the
    schema the Prefect server validates deployment runs against; a unit string still needs a byte unit."""
    import jsonschema
    from transformers.utils.hub import convert_file_size_to_int

    from adapterflow.flows.loading import load_parameters

    assert load_parameters(None, ["export.max_shard_size=1000000"]).export.max_shard_size == 1000000
    assert convert_file_size_to_int(1000000) == 1000000  # what the export passes to save_pretrained
    assert load_parameters(None, ["export.max_shard_size=500KB"]).export.max_shard_size == "500KB"
    field = flow_schema()["definitions"]["ExportSettings"]["properties"]["max_shard_size"]
    for good in (1000000, "5GB", "500MiB"):
        jsonschema.validate(good, field)
    for bad in (0, "5Gb", "1000000", True):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, field)
