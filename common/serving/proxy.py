"""An nginx site for a challenge server: TLS in front, the server on the loopback behind it.

`nginx_site` writes the HTTPS `server` block, a plain-HTTP one that redirects to it, and the
`limit_conn_zone` they need, all valid in nginx's `http` context, where Debian's nginx includes
`/etc/nginx/sites-enabled/*`. Its settings follow the challenge server's: the body limit is the
server's upload limit, the deadlines and the per-address cap are its defaults, and request
buffering is off, so an upload streams to the server, which checks the token and the size as it
arrives.
"""

# Time the server may take to check an upload after its last byte.
CHECK_SECONDS = 60

SITE = """\
# nginx site for the {challenge} challenge server, written by serve.py --nginx_config.
# Start the server behind it with --forwarded_allow_ips=127.0.0.1 (docs/serving.md, "Behind
# nginx"). Put this file in /etc/nginx/sites-available/, link it from sites-enabled/, then run
# `nginx -t && systemctl reload nginx`.

# At most {per_address} connections at once from one client address.
limit_conn_zone $binary_remote_addr zone={zone}:10m;

# Plain HTTP: every request is sent to the same address over HTTPS.
server {{
    listen {http_port};
    listen [::]:{http_port};
    server_name {server_name};
    return 301 https://$host{port_suffix}$request_uri;
}}

server {{
    listen {port} ssl;
    listen [::]:{port} ssl;
    server_name {server_name};

    # The certificate and its key (Let's Encrypt's certbot puts them here).
    ssl_certificate {certificate_dir}/fullchain.pem;
    ssl_certificate_key {certificate_dir}/privkey.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    add_header Strict-Transport-Security "max-age=31536000" always;

    # The largest upload the challenge server accepts ({max_body_bytes} bytes).
    client_max_body_size {max_body_bytes};
    # Deadlines: request headers, and a body that sends nothing, in seconds.
    client_header_timeout {header_timeout}s;
    client_body_timeout {stall_timeout}s;
    send_timeout 60s;
    keepalive_timeout 15s;
    limit_conn {zone} {per_address};
    limit_conn_status 503;

    location / {{
        proxy_pass http://{upstream};
        proxy_http_version 1.1;
        # Stream uploads to the server as they arrive, instead of storing them first.
        proxy_request_buffering off;
        # The server answers once the whole upload is in and checked.
        proxy_read_timeout {read_timeout}s;
        proxy_send_timeout {stall_timeout}s;
        # Who the client is, for the server's limits and its access log: nginx's own view,
        # replacing whatever the client sent.
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto $scheme;
    }}
}}
"""


def nginx_site(challenge, *, server_name, upstream, max_body_bytes, header_timeout,
               stall_timeout, upload_timeout, per_address, port=443, http_port=80,
               certificate_dir=None):
    """The text of the nginx site.

    Args:
        challenge: its name, in the file's first line and its connection zone's name.
        server_name: the public host name, as in the certificate.
        upstream: "HOST:PORT" of the challenge server's web role.
        max_body_bytes: the server's upload limit, nginx's client_max_body_size.
        header_timeout, stall_timeout, upload_timeout: the server's deadlines, in seconds.
        per_address: the connections one client address may hold at once.
        port: where nginx listens for HTTPS.
        http_port: where nginx listens for plain HTTP, only to redirect to HTTPS.
        certificate_dir: the folder of fullchain.pem and privkey.pem (default: certbot's
            /etc/letsencrypt/live/SERVER_NAME).
    """
    return SITE.format(challenge=challenge, server_name=server_name, upstream=upstream,
                       max_body_bytes=max_body_bytes, header_timeout=header_timeout,
                       stall_timeout=stall_timeout, read_timeout=upload_timeout + CHECK_SECONDS,
                       per_address=per_address, port=port, http_port=http_port,
                       port_suffix="" if port == 443 else f":{port}",
                       zone=f"{challenge.lower().replace('-', '_')}_per_address",
                       certificate_dir=certificate_dir or
                       f"/etc/letsencrypt/live/{server_name}")
