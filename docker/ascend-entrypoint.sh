#!/bin/bash
# Source the CANN environment, then run the command. Paths: /usr/local/Ascend/cann (CANN 9.x images) or
# /usr/local/Ascend/ascend-toolkit (older layouts), plus NNAL's ATB when installed.
for env_script in /usr/local/Ascend/cann/set_env.sh \
                  /usr/local/Ascend/ascend-toolkit/set_env.sh \
                  /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "${env_script}" ]; then
        # shellcheck disable=SC1090
        source "${env_script}"
    fi
done
exec "$@"
