"""Hostile clients at the edge: a /generate at the top of every limit beside a normal one, and sockets that
never finish their headers (slowloris)."""

from __future__ import annotations

import secrets
import socket

import httpx
import pytest
from faultkit import GENEROUS, ApiProcess, timed
from hardenkit import BACKENDS, api_on
from servicekit import burst, make_settings, queue_name, settings_env

from api.auth import create_token
from inference.testing import make_checkpoint
from trainer.tiny import tiny_pipeline_dir

pytestmark = [pytest.mark.service]


@pytest.fixture(scope="module")
def checkpoint(roots, tmp_path_factory):
    teacher = tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))  # trained at 32 px, K = 4
    return make_checkpoint(roots["models"] / f"edge-{secrets.token_hex(3)}", "sdxl", teacher)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_at_the_top_of_every_limit_beside_a_normal_request(backend, database_url, roots, checkpoint,
                                                                    tmp_path) -> None:
    with api_on(backend, pg_url=database_url, roots=roots, tmp=tmp_path,
                generate_call_timeout_seconds=GENEROUS / 2) as api:
        client = api.client
        with client.app.state.sessionmaker() as session:
            hostile, normal = ({"Authorization": f"Bearer {create_token(session=session, name=n, prefix='fdmd_')[1]}"}
                               for n in ("hostile", "normal"))
        top = {"checkpoint": str(checkpoint), "prompt": "p" * 2000, "negative_prompt": "n" * 2000,
               "guidance_scale": 30.0, "num_images": 4, "width": 128, "height": 64}  # work 4 x 8 x 4 = 128: the top
        over = client.post("/generate", json={**top, "height": 72}, headers=hostile)  # one step past it
        assert over.status_code == 422 and set(over.json()["error"]["fields"]) == {"num_images", "width", "height"}
        calls = [(hostile, {**top, "seed": i}) for i in range(10)]
        calls.append((normal, {"checkpoint": str(checkpoint), "prompt": "a digit", "seed": 1}))
        with timed() as t:
            responses = burst(client.post, calls)
        codes = [r.status_code for r in responses]
        assert responses[-1].status_code == 200, responses[-1].text  # the normal client is answered
        assert set(codes[:-1]) <= {200, 429, 503} and 429 in codes[:-1], codes  # the hostile one hit its share
        for r in responses[:-1]:
            if r.status_code == 503:
                assert r.json()["error"]["code"] in ("overloaded", "generation_timeout") and r.headers["retry-after"]
        assert t[0] < 6 * GENEROUS
        print(f"[faults] {backend}: hostile {sorted(codes[:-1])}, normal {codes[-1]}, all answered in {t[0]:.1f} s")


def test_sockets_that_never_finish_their_headers_are_closed(database_url, roots, tmp_path) -> None:
    settings = make_settings(database_url, roots, queue=queue_name("edge"), http_header_timeout_seconds=1.0)
    api = ApiProcess(settings_env(settings), tmp_path / "api.log").start()
    try:
        host, port = "127.0.0.1", api.port
        silent = socket.create_connection((host, port))  # sends nothing at all
        slow = socket.create_connection((host, port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        for sock in (silent, slow):
            sock.settimeout(GENEROUS)
            with timed() as t:
                try:
                    data = sock.recv(1024)
                except ConnectionResetError:
                    data = b""
            assert data == b"" and t[0] < GENEROUS, f"open after {t[0]:.1f} s"
            sock.close()
        # A client that sends its request in time is served, and may keep its connection for another one.
        with httpx.Client(base_url=api.url, timeout=GENEROUS) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/healthz").status_code == 200
    finally:
        api.kill()
