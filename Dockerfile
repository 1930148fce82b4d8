# Multi-stage build: compile in the Rust image, run from a slim Debian image as
# a non-root user. The service listens on 0.0.0.0:50051 inside the container,
# requires bearer tokens (see README: Docker), and keeps its SQLite file in
# /var/lib/user-service unless DATABASE_URL points at PostgreSQL.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations migrations
COPY proto proto
COPY src src
COPY tests tests
RUN cargo build --release --locked --bin user-service

FROM debian:bookworm-slim
# CA roots for a JWKS URL over https.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/user-service user-service
COPY --from=build /src/target/release/user-service /usr/local/bin/user-service
USER user-service
WORKDIR /var/lib/user-service
ENV USER_SERVICE_LISTEN=0.0.0.0:50051
# A non-loopback address needs authentication: without one of
# USER_SERVICE_AUTH_JWT_SECRET_FILE, _JWKS_FILE or _JWKS_URL the container
# stops at once and says so (README: Docker).
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["user-service", "healthcheck", "--addr", "http://127.0.0.1:50051"]
ENTRYPOINT ["user-service"]
CMD ["serve"]
