"""The domain the API and the workers share: settings, database, schemas, job service, registry."""
