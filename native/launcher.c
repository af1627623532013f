/* sqlrs-engine native launcher.
 *
 * dist/sqlrs-engine is this small program followed by the sqlrs-engine zipapp (a zip archive;
 * Python runs a zip that has a prefix). The launcher finds a Python >= 3.11 and replaces itself
 * with `python <this file> args...` (execv: same pid, so engine.json names the right process).
 *
 * Interpreter: $SQLRS_ENGINE_PYTHON when set (a path, or a name looked up on PATH), otherwise the
 * first suitable of PREFERRED_PYTHON (the Python the archive's compiled parts were built for),
 * python3, then python3.N newest first, each looked up on PATH. A candidate is suitable when it
 * runs `-I -S -c <print version>` and reports 3.11 or later. No shell is ever involved.
 */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PREFERRED_PYTHON
#define PREFERRED_PYTHON "python3"
#endif
#define MIN_MINOR 11
#define MAX_MINOR 19
#define PROBE_TIMEOUT_S 10

static const char NOT_FOUND[] = "sqlrs-engine: no Python >= 3.11 found; install python3 (3.11+) "
                                "or set SQLRS_ENGINE_PYTHON\n";
static const char PROBE[] = "import sys; print('%d.%d' % sys.version_info[:2])";

/* Why the last candidate that exists was not used (shown only when none is suitable). */
static char rejected[PATH_MAX + 128];

/* Runs `path -I -S -c PROBE`; 1 when it reports Python >= 3.11, else 0 (reason in rejected). */
static int suitable(const char *path) {
    int fds[2];
    if (pipe(fds) != 0)
        return 0;
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return 0;
    }
    if (pid == 0) {
        char *argv[] = {(char *)path, (char *)"-I", (char *)"-S", (char *)"-c", (char *)PROBE,
                        NULL};
        dup2(fds[1], STDOUT_FILENO);
        dup2(fds[1], STDERR_FILENO);
        close(fds[0]);
        close(fds[1]);
        alarm(PROBE_TIMEOUT_S);
        execv(path, argv);
        dprintf(STDOUT_FILENO, "cannot run it: %s\n", strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    char out[160] = "";
    size_t used = 0;
    for (;;) {
        char chunk[512];
        ssize_t n = read(fds[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        size_t take = sizeof out - 1 - used;
        if ((size_t)n < take)
            take = (size_t)n;
        memcpy(out + used, chunk, take);
        used += take;
    }
    out[used] = '\0';
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return 0;
    int major = 0, minor = 0;
    char end = '\0';
    int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (ok && sscanf(out, "%d.%d%c", &major, &minor, &end) == 3 && end == '\n') {
        if (major > 3 || (major == 3 && minor >= MIN_MINOR))
            return 1;
        snprintf(rejected, sizeof rejected, "%s is Python %d.%d", path, major, minor);
        return 0;
    }
    out[strcspn(out, "\n")] = '\0';
    snprintf(rejected, sizeof rejected, "%s did not report a Python version (%s)", path,
             *out ? out : "no output");
    return 0;
}

/* Tries every executable `name` on PATH in order; 1 with its path in out when one is suitable. */
static int on_path(const char *name, char *out, size_t size) {
    const char *dir = getenv("PATH");
    if (dir == NULL)
        dir = "/usr/local/bin:/usr/bin:/bin";
    for (;;) {
        const char *colon = strchr(dir, ':');
        int len = colon ? (int)(colon - dir) : (int)strlen(dir);
        int n = snprintf(out, size, "%.*s/%s", len ? len : 1, len ? dir : ".", name);
        struct stat st;
        if (n > 0 && (size_t)n < size && stat(out, &st) == 0 && S_ISREG(st.st_mode) &&
            access(out, X_OK) == 0 && suitable(out))
            return 1;
        if (colon == NULL)
            return 0;
        dir = colon + 1;
    }
}

static int find_python(char *out, size_t size) {
    const char *explicit = getenv("SQLRS_ENGINE_PYTHON");
    if (explicit && *explicit) {
        if (strchr(explicit, '/') == NULL) {
            if (on_path(explicit, out, size))
                return 1;
            if (!*rejected)
                snprintf(rejected, sizeof rejected, "SQLRS_ENGINE_PYTHON=%s: not found on PATH",
                         explicit);
            return 0;
        }
        if (strlen(explicit) >= size)
            return 0;
        strcpy(out, explicit);
        if (access(out, X_OK) != 0) {
            snprintf(rejected, sizeof rejected, "SQLRS_ENGINE_PYTHON=%s: %s", explicit,
                     strerror(errno));
            return 0;
        }
        return suitable(out);
    }
    if (on_path(PREFERRED_PYTHON, out, size))
        return 1;
    if (strcmp(PREFERRED_PYTHON, "python3") != 0 && on_path("python3", out, size))
        return 1;
    for (int minor = MAX_MINOR; minor >= MIN_MINOR; minor--) {
        char name[32];
        snprintf(name, sizeof name, "python3.%d", minor);
        if (strcmp(name, PREFERRED_PYTHON) != 0 && on_path(name, out, size))
            return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    char self[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len > 0)
        self[len] = '\0';
    else if (argc < 1 || strchr(argv[0], '/') == NULL || realpath(argv[0], self) == NULL) {
        fprintf(stderr, "sqlrs-engine: cannot locate its own executable: %s\n", strerror(errno));
        return 127;
    }
    char python[PATH_MAX];
    if (!find_python(python, sizeof python)) {
        if (*rejected)
            fprintf(stderr, "sqlrs-engine: %s\n", rejected);
        fputs(NOT_FOUND, stderr);
        return 127;
    }
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (args == NULL)
        return 127;
    args[0] = python;
    args[1] = self;
    for (int i = 1; i < argc; i++)
        args[i + 1] = argv[i];
    execv(python, args);
    fprintf(stderr, "sqlrs-engine: cannot run %s: %s\n", python, strerror(errno));
    return 127;
}
