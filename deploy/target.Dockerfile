# A demo target for the playground: stock OpenSSH, trusting the bastion's CA
# (certificate mode) and its upstream key (key mode), nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd
COPY deploy/playground/target-entrypoint.sh /usr/local/bin/target-entrypoint
ENTRYPOINT ["sh", "/usr/local/bin/target-entrypoint"]
