#!/usr/bin/env bash
# Make sure the PostgreSQL, Redis and RabbitMQ the tests use are up; start the local ones if they are not.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  echo "PostgreSQL is down; starting it" >&2
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  else
    echo "no pg_ctlcluster here: start PostgreSQL on 127.0.0.1:5432 (trust auth for postgres)" >&2
    exit 1
  fi
fi
if ! redis_up; then
  echo "Redis is down; starting it" >&2
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
  else
    echo "no redis-server here: start Redis on 127.0.0.1:6379" >&2
    exit 1
  fi
fi
# RabbitMQ: the tests' second broker (make test runs the end-to-end suite on it too).
rabbit_up() { rabbitmq-diagnostics -q check_port_listener 5672 >/dev/null 2>&1; }
if ! rabbit_up; then
  echo "RabbitMQ is down; starting it" >&2
  if command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached
  else
    echo "no rabbitmq-server here: start RabbitMQ on 127.0.0.1:5672 (guest/guest)" >&2
    exit 1
  fi
fi
for _ in $(seq 1 60); do
  if pg_up && redis_up && rabbit_up; then exit 0; fi
  sleep 1
done
echo "PostgreSQL, Redis or RabbitMQ did not come up within 60 s" >&2
exit 1
