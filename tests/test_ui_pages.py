"""The /debug and /admin pages in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The server runs with `security.auth: required`, so the pages are used as an operator would: open the
page, paste the admin key, act. What is checked is what the page shows: the KV map has pages in use
while a long request streams and none after; the token trace lists exactly the tokens (and logprobs)
the `openai` client got; a key created on /admin in three actions works with the `openai` client and
stops working once revoked there. Screenshots of each page go to docs/screenshots/.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from inferflux.server.access.keys import KeyStore
from inferflux.server.ui.traces import TOP_N
from tests.fixtures.server import Server, private_home

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
# A context long enough that one request decodes for seconds even with warm compile caches (~1-2 ms a token
# for the tiny model on 2 CPU cores), so the page's 0.4 s poll sees it decoding: the tiny model's copy with a
# 4096-position window (RoPE has no learned positions) and room for it in the KV cache.
LONG = ["runtime.max_model_len=4096", "runtime.num_pages=400"]
LONG_TOKENS = 3400


def _long_context_copy(model: Path, out: Path) -> Path:
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory) -> Iterator[tuple[Server, str]]:
    home = private_home()
    store = KeyStore.at_home(home)
    store.create_tenant("ops")
    admin_key, _ = store.create_key("ops", "admin,inference")
    model = _long_context_copy(tiny_model("llama"), tmp_path_factory.mktemp("ui-model") / "llama")
    server = Server(model, "tiny", extra=["security.auth=required", *LONG], home=home)
    yield server, admin_key
    status = server.stop()
    store.close()
    assert status == 0, server.output()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(180_000)  # a step that compiles a new XLA program (first use of a shape) takes a while
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors  # no script error on any page


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _counts(page) -> dict[str, int]:
    counts = page.locator('#kv .model[data-model="tiny"] .counts')
    return {name: int(counts.get_attribute(f"data-{name}")) for name in ("free", "used", "prefix", "cached")}


# The long request's row once it has a few output tokens, and the page counts of the same render (else null).
_DECODING = """() => {
  const row = document.querySelector('#queue tr[data-request-id="ui-long-1"][data-state="running"]');
  const counts = document.querySelector('#kv .model[data-model="tiny"] .counts');
  if (!row || !counts) return null;
  const td = [...row.querySelectorAll('td')].map((cell) => Number(cell.innerText));
  if (!(td[7] >= 4)) return null;
  return {prompt: td[4], computed: td[5], output: td[7], pages: td[9],
          used: Number(counts.dataset.used), prefix: Number(counts.dataset.prefix)};
}"""


@pytest.mark.slow  # the long request's steps compile several programs on a cold cache
def test_kv_map_shows_pages_used_while_a_long_request_streams_and_freed_after(served, page) -> None:
    server, admin_key = served
    page.goto(server.url + "/debug")
    page.fill("#admin-key", admin_key)
    page.wait_for_selector('#kv .model[data-model="tiny"]')
    assert _counts(page)["used"] + _counts(page)["prefix"] == 0

    started, done = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def stream() -> None:
        try:
            chunks = _client(server, admin_key).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "a long story " * 20}], max_tokens=LONG_TOKENS,
                stream=True, extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "ui-long-1"})
            text = []
            for chunk in chunks:
                started.set()
                text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            result["text"] = "".join(text)
            done.set()
        finally:
            started.set()

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        # Wait until the request is decoding (its row shows output tokens), not merely admitted or in prefill;
        # the row and the page counts are read from one render of the page, so they are one moment.
        now = page.wait_for_function(_DECODING).json_value()
        assert started.wait(120)  # the client is receiving the stream
        assert now["output"] >= 4 and now["computed"] >= now["prompt"] > 16, now  # past the prompt: decoding
        assert now["used"] + now["prefix"] >= 2, now  # a prompt of >16 tokens plus output: several pages
        assert now["pages"] == now["used"] + now["prefix"], now  # every page in use is this request's
        page.click('#traces tr[data-request-id="ui-long-1"]')  # the screenshot shows its tokens streaming too
        page.wait_for_selector("#trace tr.token")
        page.screenshot(path=str(SHOTS / "debug-kv.png"))  # the viewport: the map, the queue, the first tokens
        # Still running after the screenshot, so the screenshot shows it running (a finished row never returns).
        assert page.locator('#queue tr[data-request-id="ui-long-1"]').count() == 1
    finally:
        worker.join(300)
    assert done.is_set() and result["text"]
    page.wait_for_function("() => { const c = document.querySelector('#kv .model[data-model=\"tiny\"] .counts');"
                           " return c.dataset.used === '0' && c.dataset.prefix === '0'; }")
    after = _counts(page)
    assert after["used"] == after["prefix"] == 0 and after["cached"] > 0  # its full pages stay as cached prefixes
    assert page.locator('#queue tr[data-request-id="ui-long-1"]').count() == 0


def test_token_trace_lists_the_tokens_a_request_produced(served, page) -> None:
    server, admin_key = served
    reply = _client(server, admin_key).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "name three colours"}], max_tokens=8, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "ui-trace-1"})
    expected = reply.choices[0].logprobs.content
    assert len(expected) == reply.usage.completion_tokens == 8
    page.goto(server.url + "/debug")
    page.fill("#admin-key", admin_key)
    page.click('#traces tr[data-request-id="ui-trace-1"]')
    page.wait_for_selector("#trace tr.token")
    rows = page.locator("#trace tr.token")
    assert rows.count() == len(expected)
    for i, want in enumerate(expected):
        cells = rows.nth(i).locator("td")
        assert cells.nth(2).inner_text() == want.token or cells.nth(2).text_content() == want.token
        assert float(cells.nth(3).inner_text()) == pytest.approx(want.logprob, abs=1e-3)
        shown = [span.text_content() for span in cells.nth(4).locator(":scope > span > span.tok").all()]
        # The trace shows traces.TOP_N alternatives even though the request asked for 2: its 2 come first.
        assert len(shown) == TOP_N and shown[:2] == [alt.token for alt in want.top_logprobs]
    gaps = [rows.nth(i).locator("td").nth(5).inner_text() for i in range(rows.count())]
    assert gaps[0] == "" and all(g.endswith(" ms") for g in gaps[1:])
    page.screenshot(path=str(SHOTS / "debug-trace.png"), full_page=True)


def test_token_trace_shows_alternatives_for_a_request_that_asked_for_no_logprobs(served) -> None:
    """The trace's alternatives come from the step, not from the request's `logprobs`; the response stays bare."""
    server, admin_key = served
    reply = _client(server, admin_key).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "no logprobs please"}], max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "ui-no-logprobs-1"})
    assert reply.choices[0].logprobs is None and reply.usage.completion_tokens == 6
    trace = httpx.get(server.url + "/debug/api/traces/ui-no-logprobs-1",
                      headers={"Authorization": f"Bearer {admin_key}"}, timeout=30).json()
    tokens = trace["samples"][0]["tokens"]
    assert len(tokens) == 6
    for tok in tokens:
        top = tok["top"]
        assert len(top) == TOP_N, tok
        logprobs = [alt["logprob"] for alt in top]
        assert logprobs == sorted(logprobs, reverse=True) and all(v <= 0 for v in logprobs)
        # Greedy: the sampled token is the most likely one, with the same logprob.
        assert top[0]["id"] == tok["id"] and top[0]["logprob"] == pytest.approx(tok["logprob"], abs=1e-3)


def test_creating_a_key_on_admin_takes_three_actions_and_the_key_works(served, page) -> None:
    server, admin_key = served
    page.goto(server.url + "/admin")
    # The three actions: paste the admin key, name the tenant, click Create key.
    page.fill("#admin-key", admin_key)
    page.fill("#key-tenant", "webapp")
    page.click("#create-key-button")
    secret = page.wait_for_selector("#new-key-value:not(:empty)").inner_text().strip()
    assert secret.startswith("ifx")
    reply = _client(server, secret).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    assert "for webapp" in page.inner_text("#status"), page.inner_text("#status")
    page.wait_for_selector('#tenants tr[data-tenant="webapp"]', timeout=20_000)
    key_row = page.locator("#keys tr", has_text="webapp")
    assert key_row.count() == 1 and "active" in key_row.inner_text()
    page.screenshot(path=str(SHOTS / "admin.png"), full_page=True)
    # Revoking is two actions (click, confirm); the key fails from the next request on.
    page.once("dialog", lambda dialog: dialog.accept())
    key_row.locator("button", has_text="Revoke").click()
    page.wait_for_function("() => [...document.querySelectorAll('#keys tr')].some(r => r.innerText.includes('webapp')"
                           " && r.innerText.includes('revoked'))")
    with pytest.raises(openai.AuthenticationError):
        _client(server, secret).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=2)


def test_debug_data_needs_the_admin_key_and_the_page_says_so(served, page) -> None:
    server, _ = served
    page.goto(server.url + "/debug")
    page.wait_for_function("() => document.getElementById('status').innerText.startsWith('401')")
    page.fill("#admin-key", "ifx-not-a-key")
    page.wait_for_function("() => document.getElementById('status').innerText.startsWith('401')")


def test_policies_on_admin_set_in_three_actions_and_roll_back_in_two(served, page) -> None:
    server, admin_key = served
    page.goto(server.url + "/admin")
    page.fill("#admin-key", admin_key)
    first = {"blocked_terms": ["lighthouse"]}
    # Set: scope, document, Save.
    page.fill("#policy-scope", "ops")
    page.fill("#policy-document", json.dumps(first))
    page.click("#save-policy")
    page.wait_for_selector('#policies tr[data-scope="ops"]')
    # Edit it: Edit fills the form, change the document, Save: a new version.
    page.click('#policies tr[data-scope="ops"] button')
    assert json.loads(page.input_value("#policy-document")) == first
    page.fill("#policy-document", json.dumps({"blocked_terms": ["keeper"]}))
    page.click("#save-policy")
    page.wait_for_function("() => document.querySelectorAll('#policy-history tr').length >= 2")
    headers = {"Authorization": f"Bearer {admin_key}"}
    current = httpx.get(server.url + "/admin/policies/ops", headers=headers, timeout=30).json()
    assert current["document"]["blocked_terms"] == ["keeper"]
    page.screenshot(path=str(SHOTS / "admin-policies.png"), full_page=True)
    # Roll back to the first version: click, confirm.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f'#policy-history tr[data-version="{current["history"][0]}"] button')
    page.wait_for_function("() => document.getElementById('status').innerText === 'done'")
    rolled = httpx.get(server.url + "/admin/policies/ops", headers=headers, timeout=30).json()
    assert rolled["document"]["blocked_terms"] == ["lighthouse"] and rolled["version"] > current["version"]
