# Copyright (C) 2026 The synapse-fastjoin authors
# SPDX-License-Identifier: AGPL-3.0-or-later
"""State resolution helpers (what Synapse keeps in `synapse/state/`)."""
