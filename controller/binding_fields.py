"""Generated from deploy/crds/aimodelbindings.yaml by ``python -m controller.fields``: do not edit."""

from __future__ import annotations

from controller.fields import Tree

BINDING_SPEC: Tree = {
    "model": None,
    "backends": {
        "name": None,
        "provider": None,
        "endpoint": None,
        "model": None,
        "credentialsRef": {
            "name": None,
            "key": None,
            "namespace": None,
        },
        "weight": None,
        "priority": None,
        "pricing": {
            "inputPerMillion": None,
            "outputPerMillion": None,
        },
    },
    "tenants": None,
    "health": {
        "outlierDetection": {
            "consecutive5xx": None,
            "interval": None,
            "baseEjectionTime": None,
            "maxEjectionPercent": None,
        },
        "circuitBreakers": {
            "maxConnections": None,
            "maxPendingRequests": None,
            "maxRequests": None,
            "maxRetries": None,
        },
        "activeCheck": {
            "path": None,
            "interval": None,
            "timeout": None,
            "unhealthyThreshold": None,
            "healthyThreshold": None,
        },
    },
    "auth": {
        "jwt": {
            "name": None,
            "issuer": None,
            "audiences": None,
            "tenantClaim": None,
            "hs256SecretRef": {
                "name": None,
                "key": None,
                "namespace": None,
            },
            "jwks": None,
            "jwksUri": None,
            "discovery": None,
        },
    },
    "quotas": {
        "default": {
            "requests": {
                "amount": None,
                "per": None,
            },
            "tokens": {
                "amount": None,
                "per": None,
                "type": None,
            },
            "concurrent": None,
            "budget": {
                "amount": None,
                "per": None,
            },
            "defaultMaxTokens": None,
        },
        "tenants": {
            "*": {
                "requests": {
                    "amount": None,
                    "per": None,
                },
                "tokens": {
                    "amount": None,
                    "per": None,
                    "type": None,
                },
                "concurrent": None,
                "budget": {
                    "amount": None,
                    "per": None,
                },
                "defaultMaxTokens": None,
            },
        },
        "failPolicy": {
            "rateLimits": None,
            "budgets": None,
        },
    },
    "context": {
        "systemPrompt": None,
        "profile": {
            "name": None,
            "claim": None,
            "header": None,
        },
        "history": {
            "enabled": None,
            "maxTurns": None,
            "maxTokens": None,
            "ttl": None,
        },
        "knowledge": {
            "title": None,
            "text": None,
        },
        "maxContextTokens": None,
        "mcpServers": {
            "name": None,
            "url": None,
            "credentialsRef": {
                "name": None,
                "key": None,
                "namespace": None,
            },
            "credentialsHeader": None,
            "timeout": None,
            "cacheTTL": None,
        },
        "mcpSources": {
            "server": None,
            "title": None,
            "resource": None,
            "prompt": {
                "name": None,
                "arguments": {
                    "*": None,
                },
            },
            "onFailure": None,
            "maxTokens": None,
        },
    },
    "timeouts": {
        "request": None,
        "perTry": None,
    },
    "retry": {
        "on": None,
        "attempts": None,
    },
    "cache": {
        "mode": None,
        "ttl": None,
        "maxEntryBytes": None,
        "scope": None,
        "eligible": {
            "streaming": None,
            "nonStreaming": None,
            "maxTemperature": None,
        },
        "semantic": {
            "embeddingBinding": None,
            "threshold": None,
            "maxEntries": None,
        },
    },
}
