# syntax=docker/dockerfile:1
# Build: docker build -t docsidecar .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes reuse the cached layer.
# The workspace's other member (the benchmark harness) is not built, but cargo
# reads its manifest, so it comes with a stub.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bench/Cargo.toml bench/Cargo.toml
COPY proto proto
RUN mkdir -p src examples bench/src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > examples/client.rs && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked -p docsidecar \
    && rm -rf src examples
COPY src src
COPY examples examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p docsidecar && mkdir /empty-data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/docsidecar /usr/local/bin/docsidecar
# A writable data directory for the default SQLite file (mount a volume over it to keep data).
COPY --from=build --chown=65532:65532 /empty-data /data
# JSON logs for collectors; listen on all interfaces inside the pod network namespace.
# No DATABASE_URL here: it would override the discrete DB_* settings. The default
# SQLite file lands in the working directory, /data.
ENV DOCSIDECAR_LOG_FORMAT=json \
    DOCSIDECAR_LISTEN=0.0.0.0:50051
WORKDIR /data
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/docsidecar"]
CMD ["serve"]
