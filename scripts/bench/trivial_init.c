/* The trivial /init of the "plain QEMU" reference boot: it says it runs and
 * reboots at once (QEMU runs with -no-reboot, so the VM ends). */
#include <fcntl.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void) {
    int fd = open("/dev/console", O_WRONLY);
    if (fd >= 0) {
        write(fd, "TRIVIAL-INIT-READY\n", 19);
    }
    sync();
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}
