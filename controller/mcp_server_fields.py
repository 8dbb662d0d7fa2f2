"""Generated from deploy/crds/mcpservers.yaml by ``python -m controller.mcp_servers``: do not edit."""

from __future__ import annotations

from controller.fields import Tree

MCP_SERVER_SPEC: Tree = {
    "url": None,
    "toolPrefix": None,
    "credentialsRef": {
        "name": None,
        "key": None,
        "namespace": None,
    },
    "credentialsHeader": None,
    "tenants": None,
    "tools": {
        "default": None,
        "tenants": {
            "*": None,
        },
    },
    "quotas": {
        "default": {
            "requests": {
                "amount": None,
                "per": None,
            },
        },
        "tenants": {
            "*": {
                "requests": {
                    "amount": None,
                    "per": None,
                },
            },
        },
        "failPolicy": {
            "rateLimits": None,
        },
    },
    "timeout": None,
}
