"""The official `openai` Python client against the gateway (`keygate serve`).

Builds nothing itself: `scripts/test` builds `target/debug/keygate` (the CLI and the
gateway), installs the pinned `openai` and pytest into a virtual environment, and runs this
file. Override the binary with KEYGATE_BIN.
"""

import json
import os
import pathlib
import subprocess
import time

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYGATE = os.environ.get("KEYGATE_BIN", str(ROOT / "target" / "debug" / "keygate"))


def create_key(keys_file, *args):
    """Creates a key in project `test` with the CLI; returns (id, secret)."""
    out = subprocess.run(
        [KEYGATE, "--file", str(keys_file), "--json", "keys", "create",
         "--project", "test", "--create-project", *args],
        check=True, capture_output=True, text=True,
    ).stdout
    created = json.loads(out)
    return created["key"]["id"], created["secret"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    keys_file = tmp / "keys.toml"
    keys = {
        "full": create_key(keys_file, "--permissions", "all", "--allow-model", "gpt-4o-mini",
                           "--tpm", "100000"),
        "readonly": create_key(keys_file, "--permissions", "read_only"),
        "limited": create_key(keys_file, "--permissions", "all", "--rpm", "2"),
        "per_second": create_key(keys_file, "--permissions", "all", "--rpm", "60"),
    }
    audit = tmp / "audit.jsonl"
    stderr = open(tmp / "gateway.stderr", "w")
    proc = subprocess.Popen(
        [KEYGATE, "serve", "--listen", "127.0.0.1:0", "--keys-file", str(keys_file),
         "--audit-jsonl", str(audit)],
        cwd=tmp, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    first = proc.stdout.readline().strip()
    prefix = "keygate gateway listening on "
    assert first.startswith(prefix), first
    base = first[len(prefix):]
    yield {"base": base + "/v1", "keys": keys, "audit": audit}
    proc.terminate()
    proc.wait(timeout=10)
    stderr.close()


def client(gw, key, **kw):
    return openai.OpenAI(base_url=gw["base"], api_key=key, **kw)


def key(gw, name):
    return gw["keys"][name][1]


def chat(c, model="gpt-4o-mini", **kw):
    return c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, **kw)


def test_allowed_chat(gateway):
    answer = chat(client(gateway, key(gateway, "full")))
    assert answer.choices[0].message.content == "tok tok tok tok"
    assert answer.usage.completion_tokens == 4


def test_allowed_streaming_chat_with_usage(gateway):
    stream = chat(client(gateway, key(gateway, "full")), stream=True,
                  stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text == "tok tok tok tok"
    assert usage.completion_tokens == 4


def test_bad_key_raises_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, "sk-kg-not-a-real-key").models.list()
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"


def test_missing_scope_raises_permission_denied(gateway):
    c = client(gateway, key(gateway, "readonly"))
    assert len(c.models.list().data) > 0
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(c)
    assert e.value.code == "insufficient_permissions"


def test_disallowed_model_raises_permission_denied(gateway):
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(client(gateway, key(gateway, "full")), model="gpt-4o")
    assert e.value.code == "model_not_allowed"
    assert e.value.param == "model"


def test_exhausted_limit_raises_rate_limit_error(gateway):
    c = client(gateway, key(gateway, "limited"), max_retries=0)
    chat(c)
    chat(c)
    with pytest.raises(openai.RateLimitError) as e:
        chat(c)
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1


def audit_statuses(gw, key_id, at_least):
    """Statuses of the audit records of `key_id`, once there are `at_least` of them."""
    deadline = time.monotonic() + 10
    while True:
        statuses = []
        if gw["audit"].exists():
            for line in gw["audit"].read_text().splitlines():
                record = json.loads(line)
                if record.get("type") == "request" and record.get("key_id") == key_id:
                    statuses.append(record["status"])
        if len(statuses) >= at_least or time.monotonic() > deadline:
            return statuses
        time.sleep(0.05)


def test_client_retry_honours_retry_after(gateway):
    key_id, secret = gateway["keys"]["per_second"]
    plain = client(gateway, secret, max_retries=0)
    # Spend the burst (60, plus whatever refilled meanwhile) until the first refusal.
    sent = 0
    with pytest.raises(openai.RateLimitError) as refused:
        while sent < 1000:
            plain.models.list()
            sent += 1
    refused_at = time.monotonic()
    assert sent >= 60
    # The refusal names the wait until the next request is allowed (at most a second at 60
    # a minute), counted from the refusal, not from when the next client starts.
    wait = int(refused.value.response.headers["retry-after-ms"]) / 1000
    assert 0 < wait <= 1.0
    # The client's own retry waits for it and then succeeds: not before the named wait.
    client(gateway, secret, max_retries=3).models.list()
    assert time.monotonic() - refused_at >= wait - 0.01
    statuses = audit_statuses(gateway, key_id, sent + 3)
    # ... 200, the plain client's 429, the retrying client's refused first try, its retry.
    assert statuses[:sent] == [200] * sent
    assert statuses[sent:] == [429, 429, 200]
