"""Real gateway processes: a key revoked through one replica is refused by another within
a second (each drops its cached copy on the bucket's change, not after the cache TTL),
and the ``sluice`` admin commands against them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
from sluice.topology import ServiceName

from tests.support.stack import REPO, ServiceProcess, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _until_up(proc: ServiceProcess, key: str, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if proc.process.poll() is not None:
                raise RuntimeError(proc.log()[-3000:])
            try:
                r = await http.get(
                    f"http://127.0.0.1:{proc.http_port}/v1/models",
                    headers={"authorization": f"Bearer {key}"},
                )
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(proc.log()[-3000:])


def sluice(*args: str, url: str, state: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.devtools.cli", *args, "--url", url, "--state-dir", state],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_revoked_key_is_refused_by_every_gateway_within_a_second(
    nats_server, tmp_path
) -> None:
    state = tmp_path / "state"
    # Two replicas on one NATS; the second reads the admin and dev keys the first wrote.
    one = Stack(nats_url=nats_server.url, state_dir=state)
    two = Stack(nats_url=nats_server.url, state_dir=state)
    try:
        a = one.start(
            ServiceName.GATEWAY, env={"SLUICE_DEV_API_KEY": "", "SLUICE_ADMIN_API_KEY": ""}
        )
        await _until_up_admin(a, state)
        b = two.start(
            ServiceName.GATEWAY, env={"SLUICE_DEV_API_KEY": "", "SLUICE_ADMIN_API_KEY": ""}
        )
        admin_key = (state / "admin-key").read_text().strip()
        await _until_up(b, (state / "dev-key").read_text().strip())
        url_a = f"http://127.0.0.1:{a.http_port}"
        url_b = f"http://127.0.0.1:{b.http_port}"

        made = sluice(
            "teams", "create", "acme", "--tier", "free", "--json", url=url_a, state=str(state)
        )
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["tier"] == "free"
        again = sluice("teams", "create", "acme", url=url_a, state=str(state))
        assert again.returncode == 1 and "conflict" in again.stderr
        created = sluice(
            "keys",
            "create",
            "--team",
            "acme",
            "--name",
            "ci",
            "--scope",
            "chat",
            "--json",
            url=url_a,
            state=str(state),
        )
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)
        listed = sluice("keys", "list", "--team", "acme", url=url_b, state=str(state))
        assert listed.returncode == 0 and key["key_id"] in listed.stdout
        assert "KEY_ID" in listed.stdout and key["secret"] not in listed.stdout

        async with httpx.AsyncClient(
            timeout=5, headers={"authorization": f"Bearer {key['secret']}"}
        ) as http:
            # Both replicas have the key in memory now.
            assert (await http.get(f"{url_a}/v1/models")).status_code == 200
            assert (await http.get(f"{url_b}/v1/models")).status_code == 200
            revoked = sluice("keys", "revoke", key["key_id"], url=url_a, state=str(state))
            assert revoked.returncode == 0, revoked.stderr
            done = time.monotonic()
            while True:
                r = await http.get(f"{url_b}/v1/models")
                if r.status_code == 401:
                    break
                assert time.monotonic() - done < 1.0, "replica b still accepts a revoked key"
                await asyncio.sleep(0.02)
            refused_after = time.monotonic() - done
            assert "revoked" in r.json()["detail"]
        # The CLI started after the revoke answered: the time includes its exit.
        assert refused_after < 1.0

        trail = sluice("audit", "--team", "acme", "--json", url=url_b, state=str(state))
        assert trail.returncode == 0, trail.stderr
        records = json.loads(trail.stdout)["data"]
        actions = [e["action"] for e in records if e["action"] != "request"]
        assert actions == ["team.create", "key.create", "key.revoke"]
        # The key's requests are there too, the refused one with its status.
        statuses = [e["status"] for e in records if e["action"] == "request"]
        assert 200 in statuses and 401 not in statuses  # a refused key is nobody's request
        table = sluice("audit", "--team", "acme", url=url_b, state=str(state))
        assert "key.revoke" in table.stdout and "ACTION" in table.stdout
        nokey = subprocess.run(
            [
                sys.executable,
                "-m",
                "sluice.devtools.cli",
                "keys",
                "list",
                "--url",
                url_a,
                "--state-dir",
                str(tmp_path / "empty"),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert nokey.returncode == 1 and "no admin key" in nokey.stderr
        assert admin_key not in a.log() and admin_key not in b.log()
    finally:
        one.stop_all()
        two.stop_all()


async def _until_up_admin(proc: ServiceProcess, state) -> None:
    deadline = time.monotonic() + 40
    while not (state / "dev-key").exists():
        if time.monotonic() > deadline or proc.process.poll() is not None:
            raise RuntimeError(proc.log()[-3000:])
        await asyncio.sleep(0.1)
    await _until_up(proc, (state / "dev-key").read_text().strip())


async def test_a_bad_tiers_file_stops_the_gateway_with_its_line_not_a_traceback(
    nats_server, tmp_path
) -> None:
    config = tmp_path / "config"
    config.mkdir()
    for name in ("providers.yaml", "prices.yaml"):
        (config / name).write_text((REPO / "config" / name).read_text())
    (config / "tiers.yaml").write_text("tiers:\n  a:\n    priorities: [fast]\n")
    stack = Stack(
        nats_url=nats_server.url,
        state_dir=tmp_path / "state",
        extra_env={"SLUICE_CONFIG_DIR": str(config)},
    )
    gateway = stack.start(ServiceName.GATEWAY)
    try:
        code = gateway.process.wait(60)
    finally:
        stack.stop_all()
    log = gateway.log()
    assert code == 2, log[-2000:]
    assert f"configuration error: {config / 'tiers.yaml'}:3: unknown priority class 'fast'" in log
    assert "Traceback" not in log
