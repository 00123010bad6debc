# examples/lrkp-tsl.toml -> /etc/lrkp-tsl/lrkp-tsl.toml (sed -E): the example's addresses
# are documentation addresses, wrong on every host, so they are commented out; internal_ip
# is required, so the node refuses to start (check-config fails) until the operator sets it.
1i\
# /etc/lrkp-tsl/lrkp-tsl.toml, installed by the lrkp-tsl package (a conffile: your edits\
# are kept on upgrade). The node does not start until internal_ip is set:\
#   1. set internal_ip (and external_ip, control, allow) below;\
#   2. lrkp-tsl check-config\
#   3. systemctl enable --now lrkp-tsl\
# Every key: /usr/share/doc/lrkp-tsl/docs/config.md. Pair mode: docs/systemd.md there.\

s/^(internal_ip|external_ip|control|allow) = /# \1 = /
s#lrkp-tsl check-config --config examples/lrkp-tsl.toml#lrkp-tsl check-config --config /etc/lrkp-tsl/lrkp-tsl.toml#
