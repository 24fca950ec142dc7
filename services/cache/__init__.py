"""The exact cache: answers stored in JetStream KV under a canonical request hash."""
