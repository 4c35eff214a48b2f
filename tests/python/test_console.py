"""The admin console (`/admin/`) in a real browser: Playwright for Python driving the
distribution's Chromium (`/usr/bin/chromium`, or KEYGATE_CHROMIUM), against `keygate serve`
on a SQLite store.

Logs in with an admin key, creates a key and reads its secret once, sets a per-model limit,
sends a request with the key through the gateway, sees the spend in the key's table,
resets its spend, disables and re-enables the key, reserves its model to a group's members
(and lifts that), and checks that the secret never appears again in any page. A screenshot
of each page goes to target/console-screenshots/.
"""

import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYGATE = os.environ.get("KEYGATE_BIN", str(ROOT / "target" / "debug" / "keygate"))
CHROMIUM = os.environ.get("KEYGATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "target" / "console-screenshots"


def cli(store, *args):
    out = subprocess.run([KEYGATE, "--store", store, "--json", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    store = f"sqlite:{tmp / 'kg.db'}"
    admin = cli(store, "admin-keys", "create", "--name", "ops", "--scope", "manage")["secret"]
    cli(store, "projects", "create", "web")
    stderr = open(tmp / "gateway.stderr", "w")
    proc = subprocess.Popen([KEYGATE, "--store", store, "serve", "--listen", "127.0.0.1:0"],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=stderr, text=True)
    first = proc.stdout.readline().strip()
    prefix = "keygate gateway listening on "
    assert first.startswith(prefix), first
    yield {"base": first[len(prefix):], "admin": admin}
    proc.terminate()
    proc.wait(timeout=10)
    stderr.close()


def chat(base, secret):
    """One chat request with `secret`; its status."""
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={
        "authorization": f"Bearer {secret}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_console_end_to_end(gateway):
    base, admin = gateway["base"], gateway["admin"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    seen_after_creation = []

    def shot(page, name):
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def content(page):
        text = page.content()
        seen_after_creation.append(text)
        return text

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1200, "height": 900})

        # Not logged in: every page leads to the login form.
        answer = page.goto(f"{base}/admin/keys")
        assert page.url.endswith("/admin/login")
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        shot(page, "01-login")
        page.fill("#admin_key", "kg-admin-not-a-real-key")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("not a live admin key")
        page.fill("#admin_key", admin)
        page.click("button[type=submit]")
        expect(page.locator("h1")).to_have_text("Keys")
        cookie = next(c for c in page.context.cookies() if c["name"] == "kg_admin")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        shot(page, "02-keys")

        # Create a key: its secret is shown once, with a copy button (the script ran
        # under the CSP).
        page.click("text=New key")
        page.select_option("#project", "web")
        page.fill("#name", "web-app")
        page.check("input[name=permissions][value=all]")
        page.fill("#allow_models", "gpt-4o-mini, gpt-4o")
        page.fill("input[name=budget_amount]", "5")
        shot(page, "03-new-key")
        page.click("button:has-text('Create key')")
        expect(page.locator("h1")).to_have_text("Key created")
        secret = page.input_value("#secret")
        assert secret.startswith("sk-kg-")
        expect(page.locator("button[data-copy]")).to_be_visible()
        shot(page, "04-secret-once")

        # The key's page: one row per model rule; set a per-model limit.
        page.click("text=Go to the key")
        assert secret not in content(page)
        key_url = page.url
        rows = page.locator("table.models tbody tr")
        expect(rows).to_have_count(3)  # gpt-4o-mini, gpt-4o, the budget over every model
        page.fill("input[name=model]", "gpt-4o-mini")
        page.fill("input[name=amount]", "0.50")
        page.select_option("select[name=period]", "day")
        page.click("button:has-text('Set model limit')")
        mini = page.locator("table.models tbody tr", has_text="gpt-4o-mini")
        expect(mini).to_contain_text("$0.5 / day")
        assert secret not in content(page)

        # A request with the key through the gateway: its spend shows in the key's table.
        assert chat(base, secret) == 200
        deadline = time.monotonic() + 10
        while True:
            page.goto(key_url)
            # Settled spend (not only what the request held), and the day's bar.
            spent = mini.locator("td[data-label=Spent]").inner_text().strip()
            chart = page.locator("figure.chart figcaption").inner_text()
            if spent.startswith("$0.") and "$0 in all" not in chart:
                break
            assert time.monotonic() < deadline, f"no spend shown: {spent!r}, {chart!r}"
            time.sleep(0.2)
        expect(page.locator("table.compact").last).to_contain_text("allowed")
        assert secret not in content(page)
        shot(page, "05-key-with-spend")

        # Reset the key's spend (recorded as a change): the table shows nothing spent.
        page.click("button:has-text('Reset spend')")
        expect(mini.locator("td[data-label=Spent]")).to_have_text("$0")
        expect(page.locator("ul.events")).to_contain_text("key.spend_reset")

        # Disable, with a reason: the gateway refuses the key; re-enable: it works again.
        page.fill("input[name=reason]", "incident 7")
        page.click("button:has-text('Disable')")
        expect(page.locator("dl.facts")).to_contain_text("disabled")
        expect(page.locator("dl.facts")).to_contain_text("incident 7")
        assert chat(base, secret) == 401
        shot(page, "06-key-disabled")
        page.click("button:has-text('Re-enable')")
        expect(page.locator("dl.facts")).to_contain_text("active")
        assert chat(base, secret) == 200
        assert secret not in content(page)

        # Reserve the model to a group's members (a condition in the key's record): the
        # table says for whom, and the gateway refuses the key, which is in no group.
        page.fill("input[name=reserve_model]", "gpt-4o-mini")
        page.fill("input[name=reserve_group]", "research")
        page.click("button:has-text('Reserve to group')")
        expect(mini.locator("td[data-label='For whom']")).to_have_text("members of research")
        expect(page.locator("ul.conditions")).to_contain_text("members_only research models=gpt-4o-mini")
        assert chat(base, secret) == 403
        shot(page, "06b-members-only")
        page.locator("ul.conditions button:has-text('Remove')").click()
        expect(mini.locator("td[data-label='For whom']")).to_have_text("everyone")
        assert chat(base, secret) == 200

        # A form posted without its CSRF token is refused, and changes nothing.
        key_id = key_url.rsplit("/", 1)[1]
        forged = page.request.post(f"{base}/admin/keys/{key_id}/disable",
                                   form={"csrf": "forged", "reason": "x"})
        assert forged.status == 403
        page.goto(key_url)
        expect(page.locator("dl.facts")).to_contain_text("active")

        # The list, and the key page at phone width: no sideways scrolling.
        page.goto(f"{base}/admin/keys")
        expect(page.locator("table.keys")).to_contain_text("web-app")
        web_app = page.locator("table.keys tbody tr", has_text="web-app")
        expect(web_app.locator("meter")).to_have_count(1)
        expect(web_app).to_contain_text("of $5 / month")
        assert secret not in content(page)
        shot(page, "07-keys")
        page.set_viewport_size({"width": 375, "height": 800})
        page.goto(key_url)
        shot(page, "08-key-phone")
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .map(e => e.tagName + '.' + e.className).slice(0, 8)""")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), wide
        assert secret not in content(page)
        shot(page, "08-key-phone")
        page.goto(f"{base}/admin/keys")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        shot(page, "09-keys-phone")

        # The edit form, then log out: the console asks to log in again.
        page.set_viewport_size({"width": 1200, "height": 900})
        page.goto(f"{key_url}/edit")
        assert secret not in content(page)
        shot(page, "10-edit")
        page.click("button:has-text('Log out')")
        assert page.url.endswith("/admin/login")
        page.goto(key_url)
        assert page.url.endswith("/admin/login")
        browser.close()

    assert len(seen_after_creation) >= 7
    for text in seen_after_creation:
        assert secret not in text
