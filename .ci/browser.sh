#!/usr/bin/env bash
# Makes sure headless Chromium and its WebDriver (Debian's `chromium` and
# `chromium-driver`) are installed for the dashboard's browser tests
# (crates/stitch-cli/tests/dashboard.rs). Idempotent.
set -euo pipefail

if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
chromedriver --version
