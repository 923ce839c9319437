"""Behind a proxy: the nginx site `serve.py --nginx_config` writes, run by Debian's nginx as an
unprivileged foreground process with a throwaway self-signed certificate, in front of a server
trusting it (--forwarded_allow_ips=127.0.0.1). A participant at 127.0.0.3 uploads through it;
the upload is scored, and the server's access log names 127.0.0.3, not nginx nor a spoofed
X-Forwarded-For. A page asked for over plain HTTP is redirected to HTTPS."""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
from helpers import free_port, shared_path
from serving_helpers import (
    Server,
    add_participant,
    mnist_test_set,
    npy_bytes,
    open_database,
    random_sign_attack,
    run_serve,
    stop_servers_after_each_test,  # noqa: F401 (an autouse fixture)
    wait_done,
)

from benchmarks.client import session_from

pytestmark = pytest.mark.slow

EXAMPLES = 200
CLIENT = "127.0.0.3"
NGINX_CONF = """\
pid {folder}/nginx.pid;
error_log {folder}/error.log;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/site.conf;
}}
"""


def _nginx():
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx",) if os.access(path, os.X_OK)), None)
    if found is None:
        pytest.fail("nginx is not installed: apt-get install nginx (as .ci/run does)",
                    pytrace=False)
    return found


def _certificate(folder):
    """A throwaway self-signed certificate for 127.0.0.1, by openssl's command line."""
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", os.path.join(folder, "privkey.pem"),
         "-out", os.path.join(folder, "fullchain.pem")], capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 0, result.stderr
    return os.path.join(folder, "fullchain.pem")


def _site_for_test(text, folder, port, http_port):
    """The written site with this test's certificate and ports, as a host edits it (and no
    IPv6, which the test machine may lack)."""
    text = text.replace("/etc/letsencrypt/live/127.0.0.1", folder)
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    return text.replace("listen [::]:443 ssl;\n", "").replace("listen [::]:80;\n", "")


@contextlib.contextmanager
def _running_nginx(folder, port):
    with open(os.path.join(folder, "nginx.conf"), "w", encoding="utf-8") as conf:
        conf.write(NGINX_CONF.format(folder=folder))
    process = subprocess.Popen([_nginx(), "-p", folder, "-c", os.path.join(folder, "nginx.conf"),
                                "-g", "daemon off;"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited: {process.stdout.read().decode()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "nginx did not listen within 30 s"
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        process.wait(30)


def test_upload_through_nginx_is_scored_and_logged_with_the_real_client(tmp_path,
                                                                          monkeypatch):
    from common.evaluation import submission

    state, folder = tmp_path / "state", str(tmp_path / "nginx")
    os.makedirs(folder)
    server = Server(state, f"--num_eval_examples={EXAMPLES}", "--forwarded_allow_ips=127.0.0.1")
    site_path = os.path.join(folder, "written.conf")
    written = run_serve(f"--state_dir={tmp_path / 'other'}", f"--port={server.port}",
                        f"--data_path={shared_path('data', 'mnist')}",
                        f"--num_eval_examples={EXAMPLES}", f"--nginx_config={site_path}",
                        "--nginx_server_name=127.0.0.1")
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == f"nginx site for MNIST written to {site_path}"
    with open(site_path, encoding="utf-8") as site:
        text = site.read()
    # The upload limit: float64 pixels of the 200 images, the longest .npy header, 64 KiB.
    limit = 8 * EXAMPLES * 28 * 28 + 12 + submission.MAX_HEADER_BYTES + 64 * 1024
    assert f"client_max_body_size {limit};" in text
    assert f"proxy_pass http://127.0.0.1:{server.port};" in text
    assert "proxy_request_buffering off;" in text
    port, http_port = free_port(), free_port()
    with open(os.path.join(folder, "site.conf"), "w", encoding="utf-8") as site:
        site.write(_site_for_test(text, folder, port, http_port))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", _certificate(folder))
    server.wait_ready()
    _, token = add_participant(open_database(state_dir=state))
    attack = npy_bytes(random_sign_attack(mnist_test_set()[0][:EXAMPLES], seed=3))
    url = f"https://127.0.0.1:{port}"
    with _running_nginx(folder, port):
        client = session_from(CLIENT)
        answer = client.post(f"{url}/api/submissions", timeout=60,
                             headers={"Authorization": f"Bearer {token}",
                                      "X-Forwarded-For": "203.0.113.9"},
                             files={"file": ("attack.npy", attack)})
        assert answer.status_code == 202, answer.text
        view = wait_done(url, token, answer.json()["id"], servers=[server])
        too_large = client.post(f"{url}/api/submissions", data=b"x" * (limit + 1), timeout=60,
                                headers={"Authorization": f"Bearer {token}"})
        plain = client.get(f"http://127.0.0.1:{http_port}/submit?track=x", timeout=60,
                           allow_redirects=False)
    # The written site is for port 443, HTTPS's own, so the address names no port.
    assert plain.status_code == 301
    assert plain.headers["Location"] == "https://127.0.0.1/submit?track=x"
    assert view["status"] == "scored" and 0 <= view["accuracy"] <= 1, view
    assert too_large.status_code == 413 and "nginx" in too_large.text  # nginx's own answer
    with open(os.path.join(state, "access.log"), encoding="utf-8") as log:
        lines = log.read()
    assert re.search(rf'^{re.escape(CLIENT)} - - \[[^]]+\] "POST /api/submissions HTTP/1\.1" 202 ',
                     lines, re.MULTILINE), lines
    assert "203.0.113.9" not in lines
    assert '"POST /api/submissions HTTP/1.1" 413' not in lines  # never reached the server


def test_a_site_on_other_ports_redirects_to_its_own_https_port():
    from common.serving import proxy

    text = proxy.nginx_site("MNIST", server_name="challenge.example.org",
                            upstream="127.0.0.1:8000", max_body_bytes=1000, header_timeout=20,
                            stall_timeout=20, upload_timeout=300, per_address=16, port=8443,
                            http_port=8080)
    assert "listen 8080;" in text and "listen 8443 ssl;" in text
    assert "return 301 https://$host:8443$request_uri;" in text
