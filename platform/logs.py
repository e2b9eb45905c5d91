"""`python -m platform.logs JOB_ID`: logs of a job started with `submit --detach`."""

from platform.jobs import entry

if __name__ == "__main__":
    entry("logs")
