"""The client service config of llmrelay.v1 (its retry policy). DO NOT EDIT: run `make proto`."""

from typing import Final

SERVICE_CONFIG_JSON: Final = """\
{
  "methodConfig": [
    {
      "name": [{ "service": "llmrelay.v1.LLMService" }],
      "retryPolicy": {
        "maxAttempts": 3,
        "initialBackoff": "0.25s",
        "maxBackoff": "4s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]
      }
    }
  ],
  "retryThrottling": { "maxTokens": 10, "tokenRatio": 0.1 }
}
"""
