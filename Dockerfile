# Builds the podium binary and ships it on a slim Debian image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin podium

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 podium
COPY --from=build /src/target/release/podium /usr/local/bin/podium
USER podium
EXPOSE 8080
ENV PODIUM_LISTEN=0.0.0.0:8080
ENTRYPOINT ["podium"]
CMD ["serve"]
