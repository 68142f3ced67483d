/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every kernel-version difference virtio_tmem.c depends on, behind one
 * helper or one feature macro each, so that the driver itself has no
 * version checks. Tested on the Debian kernels listed in README.md.
 */
#ifndef VIRTIO_TMEM_COMPAT_H
#define VIRTIO_TMEM_COMPAT_H

#include <linux/version.h>
#include <linux/blkdev.h>
#include <linux/file.h>
#include <linux/slab.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>

/*
 * Before 6.3 swapon sets SWP_SYNCHRONOUS_IO only for drivers with rw_page,
 * and only the rw_page path is synchronous; from 6.3 on the disk's
 * synchronous flag does it and rw_page is gone.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 3, 0)
#define TMEM_HAVE_RW_PAGE 1
#else
#define TMEM_HAVE_RW_PAGE 0
#endif

/*
 * A block device opened exclusively for reading and writing. @handle is what
 * tmem_bdev_close() needs: a struct file from 6.9 on, the block device
 * before. Returns the block device or an ERR_PTR.
 */
static inline struct block_device *tmem_bdev_open(const char *path, void *holder,
						  void **handle)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	struct file *f = bdev_file_open_by_path(path, BLK_OPEN_READ | BLK_OPEN_WRITE,
						holder, NULL);

	if (IS_ERR(f))
		return ERR_CAST(f);
	*handle = f;
	return file_bdev(f);
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	struct block_device *bdev = blkdev_get_by_path(path, BLK_OPEN_READ | BLK_OPEN_WRITE,
						       holder, NULL);

	if (!IS_ERR(bdev))
		*handle = bdev;
	return bdev;
#else
	struct block_device *bdev = blkdev_get_by_path(path, FMODE_READ | FMODE_WRITE | FMODE_EXCL,
						       holder);

	if (!IS_ERR(bdev))
		*handle = bdev;
	return bdev;
#endif
}

static inline void tmem_bdev_close(void *handle, void *holder)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	fput(handle);
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	blkdev_put(handle, holder);
#else
	blkdev_put(handle, FMODE_READ | FMODE_WRITE | FMODE_EXCL);
#endif
}

/* @n virtqueues that all share @callback and are named @names[i]. */
static inline int tmem_find_vqs(struct virtio_device *vdev, unsigned int n,
				struct virtqueue *vqs[], vq_callback_t *callback,
				const char * const names[])
{
	unsigned int i;
	int err;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	struct virtqueue_info *info = kcalloc(n, sizeof(*info), GFP_KERNEL);

	if (!info)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		info[i].name = names[i];
		info[i].callback = callback;
	}
	err = virtio_find_vqs(vdev, n, vqs, info, NULL);
	kfree(info);
#else
	vq_callback_t **callbacks = kcalloc(n, sizeof(*callbacks), GFP_KERNEL);

	if (!callbacks)
		return -ENOMEM;
	for (i = 0; i < n; i++)
		callbacks[i] = callback;
	err = virtio_find_vqs(vdev, n, vqs, callbacks, (const char **)names, NULL);
	kfree(callbacks);
#endif
	return err;
}

/*
 * A disk whose blocks are whole pages, with discard and write-zeroes of any
 * length, that is non-rotational and synchronous (swap then skips its swap
 * cache round trip and its plug), and that wants stable pages: a page is not
 * modified while it is written, so the same-filled check and the PUT see
 * the same bytes. Returns the disk or an ERR_PTR.
 */
static inline struct gendisk *tmem_blk_alloc_disk(void)
{
	struct gendisk *disk;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
	struct queue_limits lim = {
		.logical_block_size = PAGE_SIZE,
		.physical_block_size = PAGE_SIZE,
		.io_min = PAGE_SIZE,
		.io_opt = PAGE_SIZE,
		.discard_granularity = PAGE_SIZE,
		.max_hw_discard_sectors = UINT_MAX,
		.max_write_zeroes_sectors = UINT_MAX,
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
		.features = BLK_FEAT_SYNCHRONOUS | BLK_FEAT_STABLE_WRITES,
#endif
	};

	disk = blk_alloc_disk(&lim, NUMA_NO_NODE);
	if (IS_ERR(disk))
		return disk;
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0)
	blk_queue_flag_set(QUEUE_FLAG_SYNCHRONOUS, disk->queue);
	blk_queue_flag_set(QUEUE_FLAG_NONROT, disk->queue);
	blk_queue_flag_set(QUEUE_FLAG_STABLE_WRITES, disk->queue);
#endif
#else
	struct request_queue *q;

	disk = blk_alloc_disk(NUMA_NO_NODE);
	if (!disk)
		return ERR_PTR(-ENOMEM);
	q = disk->queue;
	blk_queue_logical_block_size(q, PAGE_SIZE);
	blk_queue_physical_block_size(q, PAGE_SIZE);
	blk_queue_io_min(q, PAGE_SIZE);
	blk_queue_io_opt(q, PAGE_SIZE);
	q->limits.discard_granularity = PAGE_SIZE;
	blk_queue_max_discard_sectors(q, UINT_MAX);
	blk_queue_max_write_zeroes_sectors(q, UINT_MAX);
	blk_queue_flag_set(QUEUE_FLAG_NONROT, q);
	blk_queue_flag_set(QUEUE_FLAG_STABLE_WRITES, q);
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	blk_queue_flag_set(QUEUE_FLAG_SYNCHRONOUS, q);
#endif
#endif
	return disk;
}

#endif /* VIRTIO_TMEM_COMPAT_H */
